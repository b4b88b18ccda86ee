// idto3d report: start the 3D viewer. A classic script, so it also runs from file://.
// Over http(s) the viewer imports the vendored three.js modules through an import map of relative paths;
// from file:// (where browsers refuse to load module files) it imports the same sources, embedded in
// embedded.js, as blob URLs, and reads the GLBs from there too.
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('idto3d-viewer-data').textContent);
  var status = document.getElementById('viewer-status');
  var settle = {};
  var hook = window.idto3dViewer = {
    names: data.names.slice(),
    ready: new Promise(function (resolve, reject) { settle.resolve = resolve; settle.reject = reject; })
  };
  hook.ready.catch(function () {});  // a failed viewer is reported on the page, not as an unhandled rejection
  hook._fail = function (message) {
    status.textContent = message;
    status.classList.add('warning');
    document.body.dataset.viewer = 'failed';
    console.warn('idto3d-viewer failed: ' + message);
    settle.reject(new Error(message));
  };
  hook._ready = function () {
    document.body.dataset.viewer = 'ready';
    console.log('idto3d-viewer ready');
    settle.resolve(hook);
  };

  function start(imports, glbs) {
    var map = document.createElement('script');
    map.type = 'importmap';
    map.textContent = JSON.stringify({ imports: imports });
    document.head.appendChild(map);
    hook._glbs = glbs;
    var mod = document.createElement('script');
    mod.type = 'module';
    mod.onerror = function () { hook._fail('the viewer\'s modules could not be loaded'); };
    mod.textContent = "import { start } from 'idto3d/viewer';\n" +
      "start(window.idto3dViewer).catch((e) => window.idto3dViewer._fail(String(e && e.message || e)));";
    document.head.appendChild(mod);
  }

  if (location.protocol !== 'file:') {
    start(data.importMap, { kind: 'url', files: data.glbs });
    return;
  }
  if (!data.embedded) {
    hook._fail(data.fileNote);
    return;
  }
  var script = document.createElement('script');
  script.src = data.embedded;
  script.onerror = function () { hook._fail('could not load ' + data.embedded + '; run `idto3d view RUN`'); };
  script.onload = function () {
    var embedded = window.__idto3dEmbedded, imports = {};
    Object.keys(embedded.modules).forEach(function (name) {
      imports[name] = URL.createObjectURL(new Blob([embedded.modules[name]], { type: 'text/javascript' }));
    });
    start(imports, { kind: 'base64', files: embedded.glbs });
  };
  document.head.appendChild(script);
})();

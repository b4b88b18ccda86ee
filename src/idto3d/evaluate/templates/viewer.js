// idto3d report: the interactive GLB viewer (three.js). Renders on demand, so a screenshot after any
// change shows exactly that state; preserveDrawingBuffer lets tests read the pixels back.
import * as THREE from 'three';
import { GLTFLoader } from 'three/addons/loaders/GLTFLoader.js';
import { OrbitControls } from 'three/addons/controls/OrbitControls.js';
import { RoomEnvironment } from 'three/addons/environments/RoomEnvironment.js';

const BACKGROUND = 0x2b2f36;
const MORPH = 'morph/head';  // the report's key for export/morph/head.glb (never an expression name: has a '/')

function base64Buffer(text) {
  const bytes = atob(text);
  const out = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) out[i] = bytes.charCodeAt(i);
  return out.buffer;
}

export async function start(hook) {
  const canvas = document.getElementById('viewer-canvas');
  const status = document.getElementById('viewer-status');
  const buttons = document.getElementById('viewer-expressions');
  const envToggle = document.getElementById('viewer-env');
  const glbs = hook._glbs;

  const renderer = new THREE.WebGLRenderer({ canvas, antialias: true, preserveDrawingBuffer: true });
  renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
  renderer.toneMapping = THREE.NeutralToneMapping;
  const scene = new THREE.Scene();
  scene.background = new THREE.Color(BACKGROUND);
  const camera = new THREE.PerspectiveCamera(30, 1, 0.01, 100);
  const controls = new OrbitControls(camera, canvas);

  // Environment on: image-based light from three's studio room (PMREM); off: one key light and ambient.
  const pmrem = new THREE.PMREMGenerator(renderer);
  const studio = pmrem.fromScene(new RoomEnvironment(), 0.04).texture;
  const lights = new THREE.Group();
  const key = new THREE.DirectionalLight(0xffffff, 2.5);
  key.position.set(1, 1.5, 2);
  lights.add(key, new THREE.AmbientLight(0xffffff, 0.35));
  scene.add(lights);

  function render() { renderer.render(scene, camera); }
  function resize() {
    const w = Math.max(1, canvas.clientWidth), h = Math.max(1, canvas.clientHeight);
    renderer.setSize(w, h, false);
    camera.aspect = w / h;
    camera.updateProjectionMatrix();
    render();
  }
  controls.addEventListener('change', render);
  window.addEventListener('resize', resize);

  const loader = new GLTFLoader();
  const cache = new Map();
  async function load(name) {
    if (!cache.has(name)) {
      const gltf = glbs.kind === 'url' ? await loader.loadAsync(glbs.files[name])
        : await loader.parseAsync(base64Buffer(glbs.files[name]), '');
      cache.set(name, gltf.scene);
    }
    return cache.get(name);
  }

  let current = null, framed = false;
  function frame(object) {
    // Exports are centred at the origin, +Y up, facing +Z: look at the face from the front.
    const box = new THREE.Box3().setFromObject(object);
    const centre = box.getCenter(new THREE.Vector3());
    const size = box.getSize(new THREE.Vector3());
    const half = 0.6 * Math.max(size.y, size.x / camera.aspect);  // the head fills ~80% of the view
    const distance = half / Math.tan(THREE.MathUtils.degToRad(camera.fov) / 2) + size.z / 2;
    camera.near = distance / 100;
    camera.far = distance * 100;
    camera.updateProjectionMatrix();
    camera.position.set(centre.x, centre.y, centre.z + distance);
    controls.target.copy(centre);
    controls.update();
  }

  hook.setEnvironment = function (on) {
    scene.environment = on ? studio : null;
    lights.visible = !on;
    envToggle.checked = !!on;
    hook.environment = !!on;
    render();
    return Promise.resolve(hook.environment);
  };

  hook.setExpression = async function (name) {
    if (!hook.names.includes(name)) throw new Error('no exported expression ' + name);
    const object = await load(name);
    if (morphMesh) morphMesh.morphTargetInfluences.fill(0);
    for (const input of document.querySelectorAll('#viewer-morphs input')) input.value = '0';
    if (current) scene.remove(current);
    scene.add(object);
    current = object;
    if (!framed) { frame(object); framed = true; }
    hook.expression = name;
    for (const b of buttons.querySelectorAll('button')) b.classList.toggle('active', b.dataset.expression === name);
    status.textContent = 'Showing ' + name + ' (drag to orbit, scroll to zoom).';
    render();
    return name;
  };

  // Morph targets (export/morph/head.glb): the first expression's mesh with one blend shape per other
  // expression; a slider per shape sets mesh.morphTargetInfluences (shown instead of the per-expression GLB).
  let morphMesh = null;
  async function loadMorph() {
    if (!morphMesh) {
      (await load(MORPH)).traverse((o) => { if (o.isMesh && o.morphTargetDictionary) morphMesh = o; });
      if (!morphMesh) throw new Error('the morph GLB has no morph targets');
    }
    return morphMesh;
  }
  hook.setMorph = async function (target, weight) {
    const mesh = await loadMorph();
    const index = mesh.morphTargetDictionary[target];
    if (index === undefined) throw new Error('no morph target ' + target);
    const object = await load(MORPH);
    if (current !== object) {
      if (current) scene.remove(current);
      scene.add(object);
      current = object;
      for (const b of buttons.querySelectorAll('button')) b.classList.remove('active');
    }
    mesh.morphTargetInfluences[index] = Math.min(1, Math.max(0, Number(weight)));
    const slider = document.querySelector('#viewer-morphs input[data-target="' + target + '"]');
    if (slider) slider.value = String(mesh.morphTargetInfluences[index]);
    hook.expression = 'morph';
    status.textContent = 'Morph targets of ' + hook.names[0] + ': ' + target + ' = ' +
      mesh.morphTargetInfluences[index].toFixed(2) + ' (blend shapes of one mesh, ' + hook.names[0] + ' texture).';
    render();
    return mesh.morphTargetInfluences[index];
  };
  hook.morphTargets = [];
  if (glbs.files[MORPH]) {
    const mesh = await loadMorph();
    hook.morphTargets = Object.keys(mesh.morphTargetDictionary);
    const box = document.createElement('span');
    box.id = 'viewer-morphs';
    box.append('Morph targets:');
    for (const target of hook.morphTargets) {
      const label = document.createElement('label');
      const input = document.createElement('input');
      Object.assign(input, { type: 'range', min: '0', max: '1', step: '0.01', value: '0' });
      input.dataset.target = target;
      input.addEventListener('input', () => hook.setMorph(target, input.value)
        .catch((e) => hook._fail(String(e.message || e))));
      label.append(' ' + target + ' ', input);
      box.appendChild(label);
    }
    buttons.parentElement.appendChild(box);
  }

  for (const name of hook.names) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = name;
    b.dataset.expression = name;
    b.addEventListener('click', () => hook.setExpression(name).catch((e) => hook._fail(String(e.message || e))));
    buttons.appendChild(b);
  }
  envToggle.disabled = false;
  envToggle.addEventListener('change', () => hook.setEnvironment(envToggle.checked));

  resize();
  hook.setEnvironment(true);
  await hook.setExpression(hook.names[0]);
  hook._ready();
}

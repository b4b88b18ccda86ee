"""Many identities: a manifest (one identity per row) run on Ray, one ``generate`` task per row.

``manifest`` reads and checks the rows, ``task`` is what a Ray worker runs, ``board`` the actor the tasks report
to, ``engine`` submits and watches the tasks, ``live`` shows progress and ``results`` writes ``batch.json`` and
``batch.html``. Ray itself is an optional extra (``pip install 'idto3d[batch]'``) imported only when a batch runs.
"""

"""Med-URWKV MONAI Label app: thin adapters over the MONAI bundle in ``bundle/``.

``configs/``        one TaskConfig per model (finds the bundle, creates its infer/train/scoring/strategy tasks)
``infers/``         the infer task (bundle pre/post-processing and slice inferer; strict weights, AMP, hot reload)
``trainers/``       the train task (bundle ``train.json`` over the datastore's final labels) and its progress handler
``scoring/``        MC-dropout uncertainty per unlabeled volume, written into the datastore
``activelearning/`` the ``uncertainty`` strategy (``first`` and ``random`` are MONAI Label's)
``datastore.py``    the local datastore: label validation, safe ids, no silent replacement, atomic label/index writes
``imageio.py``      header-level image/label checks and size limits;  ``errors.py``: errors that reach clients as 4xx
``uploads.py``      safe names, archive extraction and sessions for what arrives over HTTP
``studies.py``      ``--studies`` given as a dataset folder (``sample_data/``) is linked, not written into
``server.py``       server-side adjustments: non-blocking ``/infer``, clear 4xx errors, loopback by default, uploads,
                    request guard (Host, web origins, login, no server paths in answers)
``options.py``      the allow-list every request option is checked against (no MONAI expressions from requests)
``auth.py``         the optional login: user file (bcrypt) and signed tokens (PyJWT)
"""

"""Network building blocks shared by the geometry and texture fields: encodings, code-conditioned transformer
blocks, state-dict helpers."""

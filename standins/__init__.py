"""Stand-ins shared by the tests (``Testing/Python``) and the benchmarks (``bench/``), so that neither
imports the other: ``networks`` (small networks with CT-SAM3D's interface), ``payloads`` (what hostile
clients send), ``slicer_standins`` (the parts of 3D Slicer that PyPI's slicer-core lacks: qt, ctk,
slicer.app, the Segment Editor's effect machinery). Nothing of CTSAM3DLib or CTSAM3D imports them (checked
by ``Testing/Python/test_lint.py``), and they are not installed with the package."""

"""molmoact-edge: run MolmoAct on a robot.

The import package maps the repository's top-level folders: ``molmoact_edge.runtime`` (no torch),
``molmoact_edge.hardware`` (no torch), ``molmoact_edge.export`` (torch), ``molmoact_edge.quantization``
and ``molmoact_edge.benchmarks``. This folder holds only the command-line entry point.
"""

__version__ = "0.1.0"

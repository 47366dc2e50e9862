"""SMoG (Synchronous Momentum Grouping) pretraining at scale.

Importing the package registers the SimCLR-width ResNets ``resnet50x2`` / ``resnet50x4`` as timm
model names, so exported backbones load with ``timm.create_model`` after ``import smog_scale``
(this imports timm; everything else is imported on use).
"""

__version__ = "0.1.0"

from smog_scale.models import backbone as _backbone  # noqa: E402,F401  (registers the timm names)

"""The networks: timm backbones, the projector and predictor heads, the SMoG model and its momentum encoder's EMA.

Imports nothing else from smog_scale.
"""

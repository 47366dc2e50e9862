"""SMoG (Synchronous Momentum Grouping) pretraining at scale. Importing the package stays cheap."""

__version__ = "0.1.0"

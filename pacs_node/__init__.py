"""pacs-node: receive DICOM series, route them to models, send the results back as DICOM."""

__version__ = "0.1.0"

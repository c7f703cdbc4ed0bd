"""pacs-node: receive DICOM series, route them to models, send the results back as DICOM."""

__version__ = "0.1.0"

#: Implementation Class UID and Version Name this node sends in its A-ASSOCIATE-AC and -RQ (how a
#: peer, or `pacs-node check`, tells a pacs-node from another DICOM application): a UID under
#: pydicom's root, derived once from a fixed name so that it never changes
#: (``pydicom.uid.generate_uid(entropy_srcs=["pacs-node implementation class"])``)
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.11122556988031968974089468654858115485"
IMPLEMENTATION_VERSION_NAME = f"PACS_NODE_{__version__}"[:16]

"""DICOM result objects: TID 1500 Structured Report and the Grad-CAM Secondary Capture."""

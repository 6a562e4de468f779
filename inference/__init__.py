"""Pure computation: frames in, scores and heat maps out. No DICOM networking, queue or database here."""

"""DICOM receiving: the C-STORE SCP, the spool, quarantine, and assembly of series into sequences."""

"""Imaging gateway: DICOM SCP/SCU relay with a store-and-forward spool."""

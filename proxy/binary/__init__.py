"""Binary downloads (series zips, DICOM, JPEG) kept on disk."""

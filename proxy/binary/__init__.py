"""The series cache's parts: NBIA image downloads (series zips, DICOM, JPEG) kept on disk.

* :mod:`proxy.binary.verdict`: what a check of a download concludes (ok or a reason code);
* :mod:`proxy.binary.zipcheck`: a series zip checked as it streams, against NBIA's own numbers;
* :mod:`proxy.binary.imagecheck`: single DICOM and JPEG answers checked as they stream.

The checks are pure (no sockets, no files): bytes in, a :class:`~proxy.binary.verdict.Verdict` out.
"""

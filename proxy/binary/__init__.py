"""The series cache's parts: NBIA image downloads (series zips, DICOM, JPEG) kept on disk.

* :mod:`proxy.binary.verdict`: what a check of a download concludes (ok or a reason code);
* :mod:`proxy.binary.zipcheck`: a series zip checked as it streams, against NBIA's own numbers;
* :mod:`proxy.binary.imagecheck`: single DICOM and JPEG answers checked as they stream;
* :mod:`proxy.binary.files`: the kept files (written beside their final name, renamed in place
  once checked, one database row each in :mod:`proxy.binary.tables`), their space and eviction;
* :mod:`proxy.binary.ranges`: what a ``Range``/``If-Range``/``HEAD`` request gets of a kept file;
* :mod:`proxy.binary.disk`: a kept file's bytes read off the event loop.

The checks are pure (no sockets, no files): bytes in, a :class:`~proxy.binary.verdict.Verdict` out.
To keep a bad download from reaching a client as a good one, a relay feeds each chunk to the
check and sends it only once the next one has arrived: when the upstream ends it calls
``finish()``, then sends the chunk it held and the end of the body if the verdict is ok, or
aborts the connection if not (a zip's last bytes are its end record: without them no client
takes it for complete).
"""

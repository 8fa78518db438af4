"""`python -m tfsd_worker`: a worker process, as the tfsd daemon starts it (fd 3 its socket)."""

from tfsd_worker._runtime import main

main()

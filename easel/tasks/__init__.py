"""The task lifecycle (``lifecycle``) and the worker that runs claimed tasks (``runner``)."""

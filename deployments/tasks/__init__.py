"""The shipped tasks, one module each (``serve_app.core.tasks``): each defines ``TASK`` and its runtime classes.

The app serves the task modules its args name (``tasks``; these by default). A new task is one more
module of the same shape, here or in any package the replicas can import.
"""

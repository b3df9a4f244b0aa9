"""Jobs at their entry node: admission, review, running, events, answers, recovery.

`JobService` (service.py) is the package's face; the module docstring there maps the rest.
"""

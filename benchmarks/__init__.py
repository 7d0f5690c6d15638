"""Side-by-side benchmarks: django-apscheduler-obs, django-apscheduler 0.7, bare APScheduler.

Run ``python -m benchmarks --help``. Results and how to read them: ``benchmarks/README.md``.
"""

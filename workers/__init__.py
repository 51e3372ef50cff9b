"""The units Ray schedules, as plain classes and functions testable without Ray:
corpus decoding and encoding steps, the generation worker, the auditor."""

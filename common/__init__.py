"""The small shared home below every other folder: seeding, secret masking, the entry points' error line."""

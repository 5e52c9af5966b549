"""`python -m app.cli ...`: what tests and `serve` (to start its workers) run."""

from app.cli import main

main()

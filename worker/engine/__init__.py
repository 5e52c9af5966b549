"""The training engine: a plain library (spec, build, data, train, callbacks, export).

No web or queue code lives here: the API, the local CLI and the worker process all
import it, and it imports none of them (``tests/test_import_contracts.py`` checks).
"""

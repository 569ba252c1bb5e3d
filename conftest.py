# Repository-root conftest: makes `import dd` work from a plain checkout and keeps tests single-threaded-cheap.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

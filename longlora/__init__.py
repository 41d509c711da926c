"""Everything beyond the tutorial files (model.py, attention.py, lora.py, train.py, sample.py): file formats, data,
memory tricks, distributed plumbing, checkpoints, the command lines' shared checks, and the tools (export, eval,
bench, the GPU check). README.md's file tree has one line per module; tests/test_layout.py keeps the imports
running one way."""

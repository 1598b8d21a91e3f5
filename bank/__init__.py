"""Stage one: the visual-prompt bank (generators, store, build/encode/derive, reader).

Import what you need from the submodules (`bank.reader.Bank`, `bank.build.build_bank`, ...):
importing `bank` itself loads nothing heavy."""

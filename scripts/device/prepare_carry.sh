#!/bin/bash
# Fills .gpu/ (ignored by git: add "/.gpu/" to .git/info/exclude) with what a lent GPU machine lacks, to be carried
# there by the device tool: papermill and its Jupyter stack as Python 3.12 wheels (the machine has torch, pandas,
# seaborn, einops, but no DVC, papermill or registry access) and Fashion-MNIST recompressed with xz (the working
# tree that travels is limited to 64 MiB). Then, on the device machine: bash scripts/device/run_profile.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/whl .gpu/fm
# the versions of this environment; jedi and debugpy are optional for IPython / ipykernel and left out (size)
pkgs=$("${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}" -m pip list --format=freeze 2>/dev/null | grep -i -E '^(papermill|nbformat|nbclient|nbconvert|jupyter[-_]client|jupyter[-_]core|traitlets|ipykernel|ipython|ipython[-_]pygments[-_]lexers|pyzmq|tornado|comm|matplotlib[-_]inline|prompt[-_]toolkit|pexpect|ptyprocess|stack[-_]data|asttokens|executing|pure[-_]eval|wcwidth|platformdirs|fastjsonschema|jsonschema|jsonschema[-_]specifications|referencing|rpds[-_]py|tenacity|entrypoints|bleach|mistune|pandocfilters|tinycss2|defusedxml|beautifulsoup4|soupsieve|webencodings|jupyterlab[-_]pygments|nest[-_]asyncio2)==')
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl $pkgs
FM=/usr/share/datasets/fashion-mnist
for f in train-images-idx3-ubyte t10k-images-idx3-ubyte; do zcat $FM/$f.gz | xz -9e > .gpu/fm/$f.xz; done
cp $FM/*labels-idx1-ubyte.gz .gpu/fm/
du -sh .gpu
# the device tool sends the tracked files too, 64 MiB in all: the executed HTML reports and reports/ablations (about
# 34 MB) are not needed there; move them aside for the calls (and back after) if the sum is over
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1); carried=$(du -sb .gpu | cut -f1)
echo "tracked $((tracked / 1048576)) MiB + .gpu $((carried / 1048576)) MiB (limit 64 MiB)"

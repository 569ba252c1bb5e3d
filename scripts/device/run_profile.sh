#!/bin/bash
# Runs the GPU profile stage by stage without DVC (python -m dd.stage, one family's chain after the other) on a lent
# GPU machine with .gpu/ (scripts/device/prepare_carry.sh) carried, usually through call.sh; resumable across calls
# while the machine stays warm: finished stages are skipped, an interrupted training resumes from its checkpoint.
# Reports and stage times are kept in /tmp/gpurep and /tmp/gpumeta; scripts/device/collect.sh packs them into $OUT.
# usage: [UNTIL=<stage>[_<family>]] bash scripts/device/run_profile.sh [more-overrides.yaml ...]
#   UNTIL stops after that stage (e.g. UNTIL=train_dd1_var: everything DD1's measurement needs, no DD2/evaluate)
set -u
cd "$(dirname "$0")/../.."
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 3
fi
export PYTHONPATH=/tmp/site:$PWD JUPYTER_PATH=/tmp/site/share/jupyter PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
FM=/usr/share/datasets/fashion-mnist
if [ ! -f $FM/t10k-labels-idx1-ubyte.gz ]; then
  mkdir -p $FM
  for f in train-images-idx3-ubyte t10k-images-idx3-ubyte; do xz -dc .gpu/fm/$f.xz | gzip -1 > $FM/$f.gz; done
  cp .gpu/fm/*labels*.gz $FM/
fi
# params.yaml (re-synced from the checkout each call) := params.yaml + profiles/gpu.yaml [+ extra]
python3 - "$@" <<'PY' || exit 4
import sys, yaml
from dd import params as P, profile
cfg = P.read_yaml("params.yaml")
for f in ["profiles/gpu.yaml"] + sys.argv[1:]:
    cfg = profile.merged(cfg, P.read_yaml(f))
P.validate(cfg)
open("params.yaml", "w").write(yaml.safe_dump(cfg, sort_keys=False))
PY
mkdir -p /tmp/gpurep /tmp/gpumeta /tmp/done /tmp/logs
cp -a /tmp/gpurep/. .   # this run's reports so far (the checkout's CPU ones are re-synced each call)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > /tmp/gpumeta/device.txt
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" >> /tmp/gpumeta/device.txt
cp params.yaml /tmp/gpumeta/params_gpu.yaml
# one family's chain through DD1 before the other's, so that a session cut short still has one family's DD1
for s in prepare features train_tokenizer:llamagen train_teacher:llamagen sample_teacher:llamagen \
         build_trajectories:llamagen train_dd1:llamagen train_tokenizer:var train_teacher:var sample_teacher:var \
         build_trajectories:var train_dd1:var train_dd2:llamagen train_dd2:var evaluate; do
  name=${s/:/_}; stage=${s%%:*}; fam=${s#*:}
  [ -f /tmp/done/$name ] && continue
  args="$stage"; [ "$fam" != "$s" ] && args="$stage --family $fam"
  touch /tmp/stamp; t0=$(date +%s%N); echo "$(date -u +%FT%TZ) start $name" | tee -a /tmp/gpumeta/log.txt
  python3 -m dd.stage $args > /tmp/logs/$name.log 2>&1; rc=$?
  t1=$(date +%s%N)
  find reports -type f -newer /tmp/stamp -exec cp --parents {} /tmp/gpurep/ \;
  if [ $rc -ne 0 ]; then echo "FAILED $name rc=$rc"; tail -30 /tmp/logs/$name.log; exit 1; fi
  echo -e "$name\t$(( (t1 - t0) / 1000000 ))" | tee -a /tmp/gpumeta/stage_ms.tsv
  touch /tmp/done/$name
  if [ "$name" = "${UNTIL:-}" ]; then echo "STOPPED after $name (UNTIL)"; exit 0; fi
done
echo ALL_DONE

#!/bin/bash
# One device call: run the profile for at most SECONDS (the call's own limit is 600 s), stop any stage still running
# (its checkpoint is atomic: the next call resumes it), and pack the reports into $OUT.
# usage (on the device machine, .gpu/ carried): bash scripts/device/call.sh SECONDS UNTIL [overrides.yaml ...]
# e.g. bash scripts/device/call.sh 540 train_dd1_var scripts/device/session30.yaml
# Issue the next call at once: a machine idle for 30 s is given back, and a fresh one starts from prepare again.
set -u
cd "$(dirname "$0")/../.."
secs=$1 until=$2; shift 2
UNTIL=$until timeout "$secs" bash scripts/device/run_profile.sh "$@" 2>&1 | tail -40
# (written so as not to match a device call's own command line, "...dd.stage...", which pkill -f would end too)
pkill -f "python3 -m dd[.]stage"; sleep 2
bash scripts/device/collect.sh > /dev/null 2>&1
cat /tmp/gpumeta/stage_ms.tsv

#!/bin/bash
# Packs what the GPU run has produced so far into $OUT (at most 8 files come back).
cd /tmp/gpurep 2>/dev/null || exit 0
tar -cJf $OUT/meta.tar.xz -C /tmp gpumeta logs gpurep/reports/metrics gpurep/reports/plots 2>/dev/null
for g in "01 02 03 04" "05 06" "07" "08" "09"; do
  files=$(for k in $g; do ls reports/${k}_*.ipynb 2>/dev/null; done)
  [ -n "$files" ] && tar -cJf $OUT/nb_${g%% *}.tar.xz $files
done
ls -la $OUT

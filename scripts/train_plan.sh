#!/usr/bin/env bash
# The remaining training of issues 17 and 14 as one resumable queue, in the order docs/training.md plans it.
# Run it in the background on the machine that trains, and rerun it after a lost session:
#
#   nohup scripts/train_plan.sh >> ~/mien-runs/plan.log 2>&1 &       # every step still to do, in order
#   scripts/train_plan.sh ablation_sr                                 # only the steps named
#   scripts/train_plan.sh --list                                      # the steps and which are done
#
# Each step resumes from its run folder (`mien train` and `mien pretrain-sr` continue from last.pt) and, once it
# has finished, leaves <step>.done in the runs folder and is skipped from then on (a step that exports a model into
# the checkout: while the exported card is there, committed or not). Runs live outside the checkout
# (MIEN_RUNS, default ~/mien-runs); the code they run is a snapshot of the checkout's HEAD taken when the plan
# starts (runs folder, src-<commit>), so editing the checkout never changes a run under way. Steps that export a
# bundled model write models/ and configs/ in this checkout and leave them for review and a commit.
# One step at a time: two trainings on two cores slow each other more than they gain. A step that fails is left
# unmarked and the plan goes on with the steps that do not need it (needs()); it exits non-zero at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RUNS=${MIEN_RUNS:-$HOME/mien-runs}
DATA=${MIEN_DATA:-$(realpath -m "$REPO/../shared/data/fer2013.npz")}
PY=${MIEN_PYTHON:-$REPO/.venv/bin/python}  # MIEN_PYTHON: another interpreter (the tests give a stand-in)
MODELS=${MIEN_MODELS:-$REPO/models}  # where the cards of exported runs are (the tests give another)

# The order: SR pre-training, its PSNR/SSIM check and its export into the repository (models/frontends/, which the SR
# arms' recipes name, so a lost run folder costs no second pre-training) first, then the second seed of Base and
# +STN (two 1-hour runs that finish inside one session), then the ablation's two SR arms (across sessions), then issue
# 14's runs, its first targets first: the two teachers' checkpoints rebuilt from the bundled files by `mien recover`,
# the born-again vgg_fer (the single-network and the ensemble targets), the FER+ network (the issue's second
# priority, but a model id that does not exist yet), then the second distillation into mini_xception (its first
# attempt peaked 2 points under the 68% target on val); then issue 17's seed models. Every run is exported as it
# finishes, so a machine lost after a run costs nothing of it: over its bundled id (the SR arms, the seed models;
# dcnn with its ten-crop averaging in the graph), as its own id (FER+), or, not served, to models/seeds/ (further
# seeds), models/variants/ (dcnn's 5-class variant) and models/trials/ (the distilled students, which replace a
# bundled model only if a session finds them better on val).
STEPS=(sr_pretrain sr_eval sr_export ablation_base_seed1 ablation_stn_seed1 ablation_sr ablation_stn_sr
    teachers vgg_fer_ba vgg_fer_ferplus mini_xception_fm
    converged_row_lstm converged_se_sepconv converged_dcnn converged_dcnn5 converged_stn_resnet10_triplet
    converged_sgan)

log() { echo "$(date -u '+%F %T') plan: $*"; }

snapshot() {  # the code the runs import: HEAD as committed, with the mien.<part> links the editable install makes
    local commit src
    commit=$(git rev-parse --short HEAD)
    src=$RUNS/src-$commit
    if [ ! -d "$src/mien" ]; then
        mkdir -p "$src.tmp"
        git archive HEAD mien training export service | tar -x -C "$src.tmp"
        for part in training export service; do ln -s "../$part" "$src.tmp/mien/$part"; done
        mv "$src.tmp" "$src"
    fi
    echo "$src"
}

mien() { PYTHONPATH=$SRC LD_PRELOAD=$PRELOAD "$PY" -m mien.cli "$@"; }

PRELOAD=${LD_PRELOAD:-}  # what the mien commands preload: tcmalloc where it is installed (allocator below)

tcmalloc() {  # awk reads the whole listing: one that stopped at the first match would leave ldconfig writing into a
    # closed pipe, and its SIGPIPE fail the pipeline under pipefail
    { ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null | awk '$1 == "libtcmalloc_minimal.so.4" && !found { print $NF; found = 1 }'
}

allocator() {  # the memory allocator of the runs: tcmalloc, since glibc's maps each activation above 32 MB afresh on
    # every step and unmaps it after (docs/training.md, "The memory allocator"; the SR arms' 96×96 maps spent a sixth of
    # their CPU time in the kernel), installed from Debian on a new machine as the venv is above (as root, with apt-get).
    # MIEN_ALLOCATOR: glibc (keep glibc's), or a library's path.
    local lib=${MIEN_ALLOCATOR:-}
    if [ "$lib" = glibc ]; then
        log "memory allocator: glibc (MIEN_ALLOCATOR)"
        return
    fi
    if [ -z "$lib" ]; then
        lib=$(tcmalloc)
        if [ -z "$lib" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            log "installing Debian's libtcmalloc-minimal4 (apt-get)"
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                libtcmalloc-minimal4; } >/dev/null 2>&1 || log "apt-get could not install libtcmalloc-minimal4"
            lib=$(tcmalloc)
        fi
    fi
    if [ -n "$lib" ] && [ -e "$lib" ]; then
        PRELOAD=$lib${PRELOAD:+:$PRELOAD}
        log "memory allocator: $lib (LD_PRELOAD of the mien commands)"
    else
        log "memory allocator: glibc${lib:+ ($lib not found)}; tcmalloc trains faster (Debian: apt-get install" \
            "libtcmalloc-minimal4; docs/training.md, \"The memory allocator\")"
    fi
}

train() {  # train <recipe stem> [more mien train options]: the recipe of configs/experiments, resumed when rerun
    local recipe=$1
    shift
    mien train --config "configs/experiments/$recipe.toml" --data "$DATA" --out "$RUNS/$recipe" "$@"
}

TEACHERS=$RUNS/vgg_fer/best.pt,$RUNS/vgg_fer_seed1/best.pt  # the two seeds, as the distillation recipes name them

exported_and_scored() {  # exported_and_scored <run> <onnx file> <id> <labels> [export options]: the run's best.pt
    # exported (with flip averaging unless other test-time options are given, scored on PublicTest by the export's
    # card), then scored on val on the labels it learnt (fer2013, or ferplus for a FER+ model)
    local run=$1 onnx=$2 id=$3 labels=$4
    shift 4
    [ $# -gt 0 ] || set -- --flip-tta
    mien export "$RUNS/$run/best.pt" --out "$onnx" --data "$DATA" --split public_test "$@" --model-id "$id"
    mien eval "$onnx" --data "$DATA" --split val --label-source "$labels" --out "$RUNS/$run/eval-val"
}

publish() {  # publish <run> <model id> [labels [export options]]: exported over the bundled id and scored on val
    # (above), calibrated (on the labels its card names), its recipe synced
    local run=$1 id=$2 labels=${3:-fer2013}
    shift $(($# < 3 ? $# : 3))
    exported_and_scored "$run" "models/$id.onnx" "$id" "$labels" "$@"
    mien calibrate "models/$id.onnx" --data "$DATA" --method top-label --fit-split val --test-split public_test
    mien recipe sync "models/$id.card.json"
}

score_seed() {  # score_seed <run> <id> [folder [export options]]: a model not served, exported to models/<folder>/
    # (seeds: a further seed, which mien results puts in the ablation's table beside its arm; variants: a model on a
    # subset of the classes, dcnn's 5-class setup; trials: a distilled student, which a session bundles only if it is
    # better on val) and scored on val (above), then on PublicTest
    local run=$1 id=$2 folder=${3:-seeds}
    shift $(($# < 3 ? $# : 3))
    exported_and_scored "$run" "models/$folder/$id.onnx" "$id" fer2013 "$@"
    mien eval "models/$folder/$id.onnx" --data "$DATA" --split public_test --out "$RUNS/$run/eval-public_test"
}

progress() {  # progress <step>: "  (n/N epochs, ≈ h left at s an epoch)" for a run under way, else nothing; the
    # epoch time is the median of the last nine (an epoch paused for a measurement does not move it)
    local history=$RUNS/$1/history.jsonl recipe=configs/experiments/$1.toml
    [ -f "$history" ] && [ -f "$recipe" ] || return 0
    python3 - "$history" "$(sed -n 's/^epochs *= *\([0-9]*\).*/\1/p' "$recipe")" <<'PY'
import json, statistics, sys
epochs = {}
for line in open(sys.argv[1]):
    if line.strip():
        entry = json.loads(line)
        epochs[entry["epoch"]] = entry["seconds"]
total = int(sys.argv[2] or 0)
if epochs and total:
    recent = statistics.median([epochs[e] for e in sorted(epochs)[-9:]])
    left = max(total - max(epochs), 0) * recent / 3600
    print(f"  ({max(epochs)}/{total} epochs, ≈ {left:.1f} h left at {recent:.0f} s an epoch)", end="")
PY
}

exported() {  # exported <step>: the card in the repository that the step's run was exported into (its training
    # command's --out is the step's run folder), if any: a step whose product is committed is done even when the
    # machine came back without its run folder and <step>.done
    python3 - "$1" "$MODELS" <<'PY'
import json, sys
from pathlib import Path
step, models = sys.argv[1], Path(sys.argv[2])
for card in sorted(card for folder in ("", "seeds/", "variants/", "trials/") for card in models.glob(f"{folder}*.card.json")):
    try:
        words = json.loads(card.read_text()).get("training", {}).get("command", "").split()
    except (OSError, ValueError):
        continue
    if "--out" in words[:-1] and Path(words[words.index("--out") + 1]).name == step:
        print(card)
        break
PY
}

SR_FRONT_END=models/frontends/edsr_x2.onnx  # the exported EDSR the SR arms' recipes name (sr_init)

PUBLISHING=" ablation_base_seed1 ablation_stn_seed1 ablation_sr ablation_stn_sr vgg_fer_ferplus vgg_fer_ba mini_xception_fm "
# (and converged_*)

finished() {  # finished <step>: its .done mark, or its product in the repository (SR pre-training: the exported
    # front end's card, or both SR arms'). A step that exports into the checkout is done only while its card is
    # there: its .done mark without the card (a work tree laid anew before the export was committed) exports again,
    # from the finished run (which resumes at its end), instead of leaving the bundled model as it was.
    if [[ $PUBLISHING == *" $1 "* || $1 == converged_* ]]; then
        local card
        card=$(exported "$1")
        [ -n "$card" ] || return 1
        # a card over a served id (models/<id>, where publish writes; score_seed writes to a folder below) ends
        # calibrated: one cut short between its export and its calibration (a session that ended, a failed
        # calibrate) is not done, so the rerun exports and calibrates again
        [ ! "$(dirname "$card")" -ef "$MODELS" ] || grep -q '"calibration"' "$card"
        return
    fi
    [ -e "$RUNS/$1.done" ] && return 0
    case $1 in
    sr_pretrain | sr_eval | sr_export)
        local front_end=${SR_FRONT_END#models/}
        [ -e "$MODELS/${front_end%.onnx}.card.json" ] ||
            { [ -n "$(exported ablation_sr)" ] && [ -n "$(exported ablation_stn_sr)" ]; } ;;
    *) [ -n "$(exported "$1")" ] ;;
    esac
}

needs() {  # needs <step>: the step that must have finished before it (SR: the pre-training, its check against
    # bicubic, its export, then the arms; the distillations: their teachers); nothing for the others
    case $1 in
    sr_eval) echo sr_pretrain ;;
    sr_export) echo sr_eval ;;
    ablation_sr | ablation_stn_sr) echo sr_export ;;
    vgg_fer_ba | mini_xception_fm) echo teachers ;;
    esac
}

step() {
    case $1 in
    sr_pretrain)
        mien pretrain-sr --data "$DATA" --epochs 40 --train-split train --val-split val --channels-last --amp auto \
            --out "$RUNS/sr_pretrain/sr.pt" --threads 2 ;;
    sr_eval)  # the SR arms test SR only if the front end beats bicubic on the val faces; then the issue's table
        mien sr-eval "$RUNS/sr_pretrain/sr.pt" --data "$DATA" --split val --threads 2 \
            --out "$RUNS/sr_pretrain/sr.val.eval.json"
        "$PY" -c 'import json, sys; m = json.load(open(sys.argv[1]))["psnr_margin_db"]
sys.exit(0 if m["ci95"][0] > 0 else f"SR does not beat bicubic on val: {m}")' "$RUNS/sr_pretrain/sr.val.eval.json"
        mien sr-eval "$RUNS/sr_pretrain/sr.pt" --data "$DATA" --split public_test --threads 2 ;;
    sr_export)  # into the checkout, for review and a commit: the file the SR arms start from, with its card
        mien export "$RUNS/sr_pretrain/sr.pt" --out "$SR_FRONT_END" --data "$DATA" ;;
    ablation_sr | ablation_stn_sr)  # exported over the bundled arm; its fine-tuned SR front end scored as above
        train "$1"
        publish "$1" "$([ "$1" = ablation_sr ] && echo sr_cnn || echo stn_sr_cnn)"
        mien sr-eval "$RUNS/$1/best.pt" --data "$DATA" --split public_test --threads 2 \
            --out "$RUNS/$1/sr.public_test.eval.json" ;;
    ablation_base_seed1) train "$1" && score_seed "$1" base_cnn_seed1 ;;
    ablation_stn_seed1) train "$1" && score_seed "$1" stn_cnn_seed1 ;;
    converged_dcnn)  # the seed paper's test protocol: the logits of the ten 42×42 views averaged inside the graph
        train "$1"
        publish "$1" dcnn fer2013 --ten-crop 42 ;;
    converged_dcnn5)
        train "$1"
        score_seed "$1" dcnn5 variants --ten-crop 42 ;;
    converged_*)  # exported over the bundled seed model (converged_<id>), scored on val, calibrated
        train "$1"
        publish "$1" "${1#converged_}" ;;
    vgg_fer_ferplus)  # issue 14's FER+ network, bundled as its own 8-label id (contempt included)
        train vgg_fer_ferplus
        publish vgg_fer_ferplus vgg_ferplus ferplus ;;
    teachers)  # best.pt of both seeds, rebuilt from the bundled files and checked against them (their run folders
        # were lost with a machine; docs/training.md)
        for id in vgg_fer vgg_fer_seed1; do
            [ -e "$RUNS/$id/best.pt" ] || mien recover "models/$id.onnx" --out "$RUNS/$id/best.pt" --data "$DATA"
        done ;;
    vgg_fer_ba | mini_xception_fm)  # exported as trial ids (models/trials/, not served) and scored on val: each
        # replaces a bundled model only if better on val, decided in a session (docs/training.md)
        train "$1" --teacher "$TEACHERS"
        score_seed "$1" "$1" trials ;;
    esac
}

main() {
    mkdir -p "$RUNS"
    if [ "${1:-}" = --list ]; then
        for s in "${STEPS[@]}"; do
            if finished "$s"; then
                echo "done  $s$([ -e "$RUNS/$s.done" ] || echo "  (its exported card is in $MODELS)")"
            else
                echo "todo  $s$(progress "$s")"
            fi
        done
        exit 0
    fi
    todo=("$@")
    [ ${#todo[@]} -gt 0 ] || todo=("${STEPS[@]}")
    for s in "${todo[@]}"; do
        [[ " ${STEPS[*]} " == *" $s "* ]] || { echo "unknown step $s (steps: ${STEPS[*]})" >&2; exit 2; }
    done
    if [ ! -x "$PY" ] && [ -z "${MIEN_PYTHON:-}" ]; then  # a new machine: the venv the test command makes, minus dev
        log "making .venv (torch 2.13.0 CPU, mien with the train extra)"
        python3 -m venv .venv
        .venv/bin/pip install -q torch==2.13.0
        .venv/bin/pip install -q -e ".[train]" --config-settings editable_mode=lenient
    fi
    SRC=$(snapshot)
    allocator
    local failed=() need status
    for s in "${todo[@]}"; do
        if finished "$s"; then
            [ -e "$RUNS/$s.done" ] || log "skip $s: its exported card is in $MODELS"
            continue
        fi
        need=$(needs "$s")
        if [ -n "$need" ] && ! finished "$need"; then
            log "skip $s: it needs $need, which has not finished"
            failed+=("$s")
            continue
        fi
        # a run started by hand finishes first (MIEN_PLAN_WAIT=0: do not wait; the tests' stand-in trains nothing)
        while [ "${MIEN_PLAN_WAIT:-1}" != 0 ] && pgrep -f "mien.cli (train|pretrain-sr)" >/dev/null; do sleep 60; done
        log "start $s (code $SRC)"
        # a failed step is left unmarked and the steps that do not need it go on: the machine keeps training
        set +e
        (set -e; step "$s")  # not in a condition, where bash would ignore set -e inside the step
        status=$?
        set -e
        if [ "$status" -eq 0 ]; then
            date -u '+%F %T' > "$RUNS/$s.done"
            log "done $s"
        elif [ "$status" -gt 128 ]; then  # a signal ended it (mien train writes last.pt on SIGTERM first): someone
            # stopped the machine's training, so the plan stops too instead of starting the next run
            log "STOPPED $s by signal $((status - 128)): the plan stops here; rerun it to resume"
            return "$status"
        else
            log "FAILED $s (exit $status): left unmarked, rerun the plan once it is fixed"
            failed+=("$s")
        fi
    done
    [ ${#failed[@]} -eq 0 ] || { log "not finished: ${failed[*]}"; return 1; }
}

# Read to the end before anything runs: bash reads a script as it goes, so editing the checkout's copy under a
# running plan would otherwise change what it runs next.
main "$@"; exit $?

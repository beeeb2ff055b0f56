#!/usr/bin/env bash
# The paper's Table 1 (cifar10) or Table 2 (cifar100) with one command: train clean, PGD-AT and
# IAAT (seeds 0 and 1), evaluate them (the paper's protocol and AutoAttack), print the table
# beside the paper's, export PGD-AT and IAAT in RobustBench's formats. Resumable: rerun the
# same command. See scripts/reproduce_table1.py.
#   bash scripts/reproduce_table1.sh cifar10 resnet18 [--corruptions DIR] [--estimate]
set -euo pipefail
exec python "$(dirname "$0")/reproduce_table1.py" "$@"

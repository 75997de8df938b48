#!/usr/bin/env bash
# Stops the local services started by scripts/services.sh (the `shop run` process stops on Ctrl-C).
exec bash "$(dirname "$0")/services.sh" down

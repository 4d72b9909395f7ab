#!/usr/bin/env bash
# Plots each cost against N on log-log axes (gnuplot, SVG).
#   scripts/bench-plot-loglog.sh RUNS.tsv OUT.svg [TITLE]
# RUNS.tsv: the format scripts/bench-plot.sh reads (PANEL, CATEGORY,
# SERIES, VALUE, tab-separated; '#' lines skipped), with CATEGORY a number
# N. Each PANEL is one chart, x = N and y = VALUE both on log axes, each
# SERIES a line through its points. A panel whose name contains "dashed"
# also gets a dashed line of slope 1 (cost linear in N) through the first
# point of its first series: a series steeper than it grows worse than
# linearly. Non-positive values are left out (a log axis cannot show them).
set -euo pipefail

in=${1:?usage: bench-plot-loglog.sh RUNS.tsv OUT.svg [TITLE]}
out=${2:?usage: bench-plot-loglog.sh RUNS.tsv OUT.svg [TITLE]}
title=${3:-}
command -v gnuplot >/dev/null || { echo "bench-plot-loglog: gnuplot is missing (make bench-deps installs gnuplot-nox)" >&2; exit 1; }
[ -s "$in" ] || { echo "bench-plot-loglog: $in is empty" >&2; exit 1; }

script=$(mktemp "${TMPDIR:-/tmp}/bench-plot.XXXXXX")
trap 'rm -f "$script"' EXIT

awk -F'\t' -v out="$out" -v title="$title" '
function q(s) { gsub(/\047/, "\047\047", s); return "\047" s "\047" }
function idx(arr, n, key,    i) {
    for (i = 1; i <= n[0]; i++) if (arr[i] == key) return i
    arr[++n[0]] = key; return n[0]
}
/^#/ || NF < 4 || $4 + 0 <= 0 || $2 + 0 <= 0 { next }
{
    p = idx(P, np, $1); s = idx(S, ns, $3)
    k = p SUBSEP s
    cnt[k]++; xs[k, cnt[k]] = $2 + 0; ys[k, cnt[k]] = $4 + 0
    if (!(p in xlo) || $2 + 0 < xlo[p]) xlo[p] = $2 + 0
    if (!(p in xhi) || $2 + 0 > xhi[p]) xhi[p] = $2 + 0
}
END {
    if (np[0] == 0) { print "bench-plot-loglog: no data" > "/dev/stderr"; exit 1 }
    cols = np[0] > 1 ? 2 : 1; rows = int((np[0] + cols - 1) / cols)
    w = cols == 2 ? 1200 : 800; h = 360 * rows + (title != "" ? 40 : 0)
    printf "set terminal svg size %d,%d dynamic noenhanced font \"sans,11\" background \"white\"\n", w, h
    print "set encoding utf8"
    printf "set output %s\n", q(out)
    split("#1f77b4 #d62728 #2ca02c #ff7f0e #9467bd #8c564b #e377c2 #7f7f7f", col, " ")
    if (title != "") printf "set multiplot layout %d,%d title %s\n", rows, cols, q(title)
    else printf "set multiplot layout %d,%d\n", rows, cols
    print "set grid xtics ytics mxtics mytics lc rgb \"#dddddd\""
    print "set key below horizontal"
    print "set border 3; set tics nomirror"
    print "set logscale xy"
    print "set xlabel \"N idle connections\""
    for (p = 1; p <= np[0]; p++) {
        printf "set title %s\n", q(P[p])
        printf "set xrange [%g:%g]\n", xlo[p] / 1.5, xhi[p] * 1.5
        print "set yrange [*:*]"
        plot = ""; first = 0
        for (s = 1; s <= ns[0]; s++) {
            k = p SUBSEP s
            if (!(k in cnt)) continue
            name = "$p" p "s" s
            printf "%s << EOD\n", name
            for (i = 1; i <= cnt[k]; i++) printf "%.10g %.10g\n", xs[k, i], ys[k, i]
            print "EOD"
            if (!first) { first = 1; x0 = xs[k, 1]; y0 = ys[k, 1] }
            c = col[(s - 1) % 8 + 1]
            plot = plot (plot == "" ? "" : ", ") sprintf("%s using 1:2 with linespoints pt 7 ps 0.8 lw 2 lc rgb \"%s\" title %s", name, c, q(S[s]))
        }
        if (P[p] ~ /dashed/ && first) {
            printf "$ref%d << EOD\n%.10g %.10g\n%.10g %.10g\nEOD\n", p, xlo[p] / 1.5, y0 * xlo[p] / 1.5 / x0, xhi[p] * 1.5, y0 * xhi[p] * 1.5 / x0
            plot = plot sprintf(", $ref%d using 1:2 with lines dt 2 lw 1 lc rgb \"#555555\" title \"linear in N\"", p)
        }
        print "plot " plot
    }
    print "unset multiplot"
}' "$in" >"$script"

gnuplot "$script"

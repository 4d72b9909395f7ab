#!/usr/bin/env bash
# Plots every run of a benchmark as a point (gnuplot, SVG).
#   scripts/bench-plot.sh RUNS.tsv OUT.svg [TITLE]
# RUNS.tsv: one line per run and metric, tab-separated:
#   PANEL  CATEGORY  SERIES  VALUE
# e.g. "keep-alive req/s<TAB>keep-alive<TAB>nginx<TAB>51234". Lines starting
# with '#' are skipped. Each PANEL is one chart; CATEGORY is its x axis;
# each SERIES has its colour, its points side by side within a category
# (runs spread a little so equal values stay visible) and a short bar at its
# median. Panels, categories and series keep the order they first appear in.
# A panel whose positive values span more than 50x gets a log y axis.
set -euo pipefail

in=${1:?usage: bench-plot.sh RUNS.tsv OUT.svg [TITLE]}
out=${2:?usage: bench-plot.sh RUNS.tsv OUT.svg [TITLE]}
title=${3:-}
command -v gnuplot >/dev/null || { echo "bench-plot: gnuplot is missing (make bench-deps installs gnuplot-nox)" >&2; exit 1; }
[ -s "$in" ] || { echo "bench-plot: $in is empty" >&2; exit 1; }

script=$(mktemp "${TMPDIR:-/tmp}/bench-plot.XXXXXX")
trap 'rm -f "$script"' EXIT

awk -F'\t' -v out="$out" -v title="$title" '
function q(s) { gsub(/\047/, "\047\047", s); return "\047" s "\047" }
function idx(arr, n, key,    i) {          # position of key, appended if new
    for (i = 1; i <= n[0]; i++) if (arr[i] == key) return i
    arr[++n[0]] = key; return n[0]
}
/^#/ || NF < 4 { next }
{
    p = idx(P, np, $1); c = idx(C, nc, $2); s = idx(S, ns, $3)
    inpanel[p, c] = 1
    k = p SUBSEP c SUBSEP s
    nrun[k]++; val[k, nrun[k]] = $4 + 0
    if (!(p in lo) || $4 + 0 < lo[p]) lo[p] = $4 + 0
    if (!(p in hi) || $4 + 0 > hi[p]) hi[p] = $4 + 0
}
END {
    if (np[0] == 0) { print "bench-plot: no data" > "/dev/stderr"; exit 1 }
    cols = np[0] > 1 ? 2 : 1; rows = int((np[0] + cols - 1) / cols)
    w = cols == 2 ? 1200 : 800; h = 360 * rows + (title != "" ? 40 : 0)
    printf "set terminal svg size %d,%d dynamic noenhanced font \"sans,11\" background \"white\"\n", w, h
    print "set encoding utf8"
    printf "set output %s\n", q(out)
    palette = "#1f77b4 #d62728 #2ca02c #ff7f0e #9467bd #8c564b #e377c2 #7f7f7f"
    split(palette, col, " ")
    if (title != "") printf "set multiplot layout %d,%d title %s\n", rows, cols, q(title)
    else printf "set multiplot layout %d,%d\n", rows, cols
    print "set grid ytics lc rgb \"#dddddd\""
    print "set key below horizontal"
    print "set border 3; set tics nomirror"
    for (p = 1; p <= np[0]; p++) {
        # the categories this panel has, in order
        n = 0; tics = ""
        for (c = 1; c <= nc[0]; c++) if ((p, c) in inpanel) {
            x[c] = n; tics = tics (n ? ", " : "") q(C[c]) " " n; n++
        }
        # the series this panel has
        m = 0
        for (s = 1; s <= ns[0]; s++) {
            has[s] = 0
            for (c = 1; c <= nc[0]; c++) if ((p SUBSEP c SUBSEP s) in nrun) has[s] = 1
            if (has[s]) pos[s] = m++
        }
        width = 0.7; step = m > 0 ? width / m : width
        printf "set title %s\n", q(P[p])
        printf "set xtics (%s)\n", tics
        printf "set xrange [-0.5:%f]\n", n - 0.5
        if (lo[p] > 0 && hi[p] / lo[p] > 50) print "set logscale y; set yrange [*:*]"
        else if (lo[p] == hi[p]) {   # one value only (all zero, say): a range around it
            print "unset logscale y"
            printf "set yrange [%.10g:%.10g]\n", (lo[p] >= 0 ? 0 : lo[p] * 2), (hi[p] > 0 ? hi[p] * 2 : 1)
        } else { print "unset logscale y"; printf "set yrange [%s:*]\n", (lo[p] >= 0 ? 0 : "*") }
        plot = ""
        for (s = 1; s <= ns[0]; s++) if (has[s]) {
            name = "$p" p "s" s
            printf "%s << EOD\n", name
            medname = "$m" p "s" s
            med = ""
            for (c = 1; c <= nc[0]; c++) {
                k = p SUBSEP c SUBSEP s
                if (!(k in nrun)) continue
                r = nrun[k]
                x0 = x[c] - width / 2 + step * (pos[s] + 0.5)
                for (i = 1; i <= r; i++) {
                    jit = r > 1 ? (i - (r + 1) / 2) * step * 0.5 / r : 0
                    printf "%f %.10g\n", x0 + jit, val[k, i]
                    v[i] = val[k, i]
                }
                # median: sort the r values (insertion sort; r is small)
                for (i = 2; i <= r; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
                mv = r % 2 ? v[(r + 1) / 2] : (v[r / 2] + v[r / 2 + 1]) / 2
                med = med sprintf("%f %.10g %f 0\n", x0 - step * 0.4, mv, step * 0.8)
            }
            print "EOD"
            printf "%s << EOD\n%sEOD\n", medname, med
            colour = col[(s - 1) % 8 + 1]
            plot = plot (plot == "" ? "" : ", ") \
                sprintf("%s using 1:2 with points pt 7 ps 0.7 lc rgb \"%s\" title %s", name, colour, q(S[s])) \
                sprintf(", %s using 1:2:3:4 with vectors nohead lw 2 lc rgb \"%s\" notitle", medname, colour)
        }
        print "plot " plot
    }
    print "unset multiplot"
}' "$in" >"$script"

gnuplot "$script"

# gnuplot script for scripts/bench/plot.sh; expects datdir, outdir, policies, plottitle.
# .dat columns: budget_pct policy conc tokens_per_s hit_rate moved_mib stall_ms ttft_p50_ms itl_p50_ms
set terminal pngcairo size 900,600 enhanced font "DejaVu Sans,12"
set grid
set key top left box opaque
set xlabel "expert cache budget (% of each layer's experts)"
set xrange [0:105]
set xtics 0,25,100

set output outdir."/tokens_per_s_vs_budget.png"
set title plottitle."\ndecode throughput vs cache budget"
set ylabel "output tokens/s (log scale)"
set logscale y
set yrange [*:*]
plot for [i=1:words(policies)] datdir."/".word(policies,i).".dat" using 1:4 with linespoints lw 2 dt i pt 4+2*i ps 1.5 title word(policies,i)

set output outdir."/hit_rate_vs_budget.png"
set title plottitle."\nexpert cache hit rate vs budget"
unset logscale y
set ylabel "hit rate"
set yrange [0:1.05]
plot for [i=1:words(policies)] datdir."/".word(policies,i).".dat" using 1:5 with linespoints lw 2 dt i pt 4+2*i ps 1.5 title word(policies,i)

# Rank scaling (scaling.dat: ranks assignment conc tokens_per_s tokens_per_s_per_rank a2a_B_per_token),
# when the sweep ran under mpirun.
if (strlen(system("test -f ".datdir."/scaling.dat && echo y")) > 0) {
  set output outdir."/tokens_per_s_vs_ranks.png"
  set title plottitle."\nthroughput per GPU vs ranks (expert-parallel MoE, all experts resident)"
  set xlabel "ranks (GPUs)"
  set xrange [0.5:*]
  set xtics 1
  set ylabel "output tokens/s per rank"
  set yrange [0:*]
  plot datdir."/scaling.dat" using 1:(strcol(2) eq "round_robin" ? $5 : 1/0) with linespoints lw 2 pt 6 ps 1.5 title "round robin", \
       datdir."/scaling.dat" using 1:(strcol(2) eq "locality" ? $5 : 1/0) with linespoints lw 2 pt 8 ps 1.5 title "locality"
}

"""Sweeps: a grid of settings x seeds run one after another, each in its own run directory,
resumable, summarised over seeds (plan: what runs; runner: running them; summary: the table
and the plots)."""

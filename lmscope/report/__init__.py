"""Report: plots and (later) the self-contained HTML report."""

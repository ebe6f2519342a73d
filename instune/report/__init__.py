"""Reports: self-contained HTML files and Markdown summaries of train, sweep and eval runs."""

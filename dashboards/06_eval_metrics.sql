SELECT * FROM eval_summary

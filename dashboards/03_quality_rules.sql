SELECT * FROM quality_summary

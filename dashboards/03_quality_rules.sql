SELECT * FROM quality_rules

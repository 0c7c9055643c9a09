DROP TABLE metric_rollup_state;
DROP TABLE metric_hourly;
DROP TABLE metric_dirty_hours;
DROP TABLE metric_samples;

"""What the records say: calibration, validation against simpler predictors, baseline
comparison, reports and the quick-loop pipeline."""

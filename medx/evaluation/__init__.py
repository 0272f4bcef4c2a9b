"""Clinical evaluation of classifiers: metrics with CIs, operating points, calibration, plots."""

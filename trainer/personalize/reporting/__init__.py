"""What a user sees while a run goes on, built from the loop's `StepRecord`s:

    rows.py          one losses.csv row per step: the losses, L_det per timestep, the statistics
    trackers.py      the user's experiment trackers (reporting.trackers) through accelerate
    step_samples.py  the validation grid every validation.everySteps steps and at the stop

The older reporting modules (progress, metrics, plotting, status_reporter) sit beside this
package; each consumer treats a field the loop did not fill (None) as "not measured".
"""

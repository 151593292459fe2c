"""Privacy: what a curious cloud operator can recover from exactly what it received in a run, and the cut defense.

The package measures three things: which tokens of the data owner's text the cloud can read back from the
bottom-cut states it received (four attacks, with the weights it shipped and with the tuned ones), which labels
it can read from the top-cut gradients, and the (epsilon, delta) that the optional cut noise implies. It has ONE
documented hook into the model: `record.attach(model, cfg, total_steps, recorder)` installs a `PrivacyTap` as
`StagedModel.cut_transform` (the model's hook, applied to the bottom stage's output) plus a forward-pre-hook on
the top stage, and reads the live session (for opening sealed requests) only through `StagedModel.session`
(None outside split mode). Nothing here reaches into the model's internals. Modules: `record` (recording and the
tap), `cloud_view` (reading the recording back), `attacks`, `defenses`, and `audit` (the run that ties them up).
"""

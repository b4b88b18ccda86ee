"""The method as a sequence of steps over one run folder: identity -> initial geometry -> geometry SDS ->
(photo) texture -> texture SDS -> export, and ``generate`` that runs them."""

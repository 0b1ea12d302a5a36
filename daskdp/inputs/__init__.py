"""Input: read prompts (`read`) and survey them once on the workers (`survey`)."""

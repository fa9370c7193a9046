"""Files in and out: safe files, PEFT adapter folders, model loading, exports."""

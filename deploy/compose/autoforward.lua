-- Orthanc auto-forward: every stable CT or MR series goes to the pacs-node receiver, except
-- the series pacs-node produced (their SeriesDescription starts with "AI "), so results are
-- never sent back round.
function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality'] or ''
  local description = tags['SeriesDescription'] or ''
  if (modality == 'CT' or modality == 'MR') and string.sub(description, 1, 3) ~= 'AI ' then
    print('forwarding series ' .. seriesId .. ' to pacs-node')
    -- the REST call stores the whole series in one association (Lua's SendToModality
    -- takes instances only)
    RestApiPost('/modalities/pacsnode/store', seriesId)
  end
end
